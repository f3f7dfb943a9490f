"""Training data: LLaVA-style or TRL-style conversations checked before the model loads, the dataset and the
collator that pads answers with end-of-text and masks them for the diffusion stage."""

import codecs
import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import re
from typing import Optional

import torch
from transformers import TrainerCallback

from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple import processing_dimple  # noqa: E402


from dimple_tools.training.arguments import IMAGE_PLACEHOLDER, MAX_ASPECT_RATIO, ROLES

logger = logging.getLogger("train_dimple")


def padded_answer_length(n: int, rng: random.Random, pad_to: int = 0) -> int:
    """Answer + padding length, drawn uniformly in [n + 1, next bucket]: below 16 tokens the next power of
    two, else the next multiple of 16 (at least one `<|endoftext|>` always follows the answer); with
    `pad_to` > 0 the upper end is at least `pad_to` (`--answer_padding_to`)."""
    if n + 1 <= 16:
        bucket = 1 << math.ceil(math.log2(n + 1))
    else:
        bucket = 16 * math.ceil((n + 1) / 16)
    return rng.randint(n + 1, max(bucket, pad_to))


class DataProblems(ValueError):
    """Every problem found in the training data, one per line as `file:line: sample id: what`."""

    def __init__(self, data_path: str, problems: list, limit: int = 200, flag: str = "--data_path"):
        self.problems = problems
        shown = problems[:limit]
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(
            f"{flag} {data_path}: {len(problems)} problem(s), nothing trained:\n  " + "\n  ".join(shown) + more
        )


def decode_lines(path: pathlib.Path, data: bytes, flag: str = "--data_path") -> tuple:
    """(text, {line number: what}) of a file's bytes: each line is decoded as UTF-8 (a UTF-8 byte-order mark is
    dropped), a line that is not UTF-8 is kept with its undecodable bytes replaced and named in the dict."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            data.decode("utf-16")
        except UnicodeDecodeError:
            pass
        else:
            raise ValueError(f"{flag} {path} is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines, undecodable = [], {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            bad = raw[error.start:error.end]
            undecodable[number] = (
                f"not UTF-8 text: byte{'s' if len(bad) > 1 else ''} {' '.join(f'0x{b:02x}' for b in bad)} at byte "
                f"{error.start + 1} of the line ({error.reason}); the file must be UTF-8"
            )
            lines.append(raw.decode("utf-8", errors="replace"))
    return "\n".join(lines), undecodable


def _sample_name(record) -> str:
    return f"sample {record['id']}: " if isinstance(record, dict) and isinstance(record.get("id"), (str, int)) else ""


def read_records(path: pathlib.Path, flag: str = "--data_path") -> tuple:
    """(records, line numbers, problems) of a JSON list or a JSONL file; a JSONL line that does not parse, or a
    line that is not UTF-8, is a problem naming its line (and the sample, where it still reads), the others are
    still read."""
    text, undecodable = decode_lines(path, path.read_bytes(), flag)
    if not text.strip():
        raise ValueError(f"{flag} {path} holds no samples")
    records, lines, problems = [], [], []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 may be in a JSON string
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    if number in undecodable:  # the bytes replaced may be what does not parse
                        problems.append(f"{path.name}:{number}: {undecodable[number]}")
                    else:
                        problems.append(f"{path.name}:{number}: not valid JSON: {error.msg} (column {error.colno})")
                    continue
                if number in undecodable:
                    problems.append(f"{path.name}:{number}: {_sample_name(record)}{undecodable[number]}")
                    continue
                records.append(record)
                lines.append(number)
        return records, lines, problems
    try:
        start = len(text) - len(text.lstrip())
        if not text.startswith("[", start):
            records = json.loads(text)  # not a list: named below
            return records, None, [f"{path.name}:{number}: {what}" for number, what in undecodable.items()]
        # A list, read record by record to know the line each starts on.
        decoder, position, line, counted = json.JSONDecoder(), start + 1, 1, 0
        separators = re.compile(r"\s*(,\s*)?")
        ends = []
        while True:
            position = separators.match(text, position).end()
            if text.startswith("]", position):
                break
            line += text.count("\n", counted, position)
            counted = position
            record, position = decoder.raw_decode(text, position)
            records.append(record)
            lines.append(line)
            ends.append(line + text.count("\n", counted, position))
        if text[position + 1:].strip():
            json.loads(text)  # raises "Extra data" at the right place
    except json.JSONDecodeError as error:
        hint = " (one record per line is a .jsonl file)" if "Extra data" in str(error) else ""
        encoding = "".join(f"; line {number}: {what}" for number, what in undecodable.items())
        raise ValueError(
            f"{flag} {path}: not valid {path.suffix[1:].upper() or 'JSON'}{hint}: {error}{encoding}"
        ) from None
    if undecodable:  # the records holding lines that are not UTF-8 are problems, the others still read
        kept, named = [], set()
        for index, record in enumerate(records):
            bad = [number for number in undecodable if lines[index] <= number <= ends[index]]
            problems += [f"{path.name}:{number}: {_sample_name(record)}{undecodable[number]}" for number in bad]
            named.update(bad)
            if not bad:
                kept.append(index)
        problems += [f"{path.name}:{number}: {what}" for number, what in undecodable.items() if number not in named]
        records, lines = [records[i] for i in kept], [lines[i] for i in kept]
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

    def __init__(self, samples: list, processor, max_seq_length: int, seed: int = 0, fixed_masks: bool = False,
                 answer_padding_to: int = 0):
        self.samples, self.processor, self.max_seq_length, self.seed = samples, processor, max_seq_length, seed
        self.answer_padding_to = answer_padding_to
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
        length = padded_answer_length(len(answer), random.Random(self.seed * 1_000_003 + index), self.answer_padding_to)
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
