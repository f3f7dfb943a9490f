"""Processor of Dimple: transformers' Qwen2-VL image processor + transformers' Qwen2 tokenizer.

`DimpleProcessor` turns prompts (usually rendered with `apply_chat_template`) and images into model inputs:
`input_ids` / `attention_mask` (left-padded batches) with every `<|image_pad|>` expanded to one token per
merged image patch, and `pixel_values` / `image_grid_thw` from the Qwen2-VL image processor. It also turns
generated ids back into answers (`decode_answers`).

Works with transformers 4.x (which declares sub-processors as class attributes) and 5.x (which infers them
from the `__init__` signature).
"""

import json
import math
import os
import pathlib

import transformers
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import get_image_size, is_pil_image, load_image, to_numpy_array

# Qwen2-VL's `smart_resize` rejects images more elongated than this; checking first gives a clearer error.
MAX_ASPECT_RATIO = 200

_TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5


class DimpleProcessor(ProcessorMixin):
    r"""Pairs a Qwen2-VL image processor with a Qwen2 tokenizer.

    Args:
        image_processor (`Qwen2VLImageProcessor`): resizes images to multiples of 28 px within
            [min_pixels, max_pixels], normalises them and flattens them into 1176-value patches.
        tokenizer (`Qwen2Tokenizer` / `Qwen2TokenizerFast`): the Qwen2.5 vocabulary plus Dream's `<|mask|>`.
            Its `padding_side` is set to `"left"`: a diffusion canvas is appended to the right of the prompt.
        chat_template (`str`, *optional*): Jinja chat template; defaults to the tokenizer's (Qwen2-VL's).
    """

    if _TRANSFORMERS_4:
        # 4.x loads and type-checks sub-processors from these names; 5.x infers them from `__init__`
        # (and warns about these attributes), so they are declared only for 4.x.
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = ("Qwen2Tokenizer", "Qwen2TokenizerFast")
        valid_kwargs = ["chat_template"]

    image_token = "<|image_pad|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # `kwargs` absorbs keys that older processor configs carry (e.g. `image_token`); none is needed.
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.tokenizer.padding_side = "left"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self):
        return list(dict.fromkeys(self.tokenizer.model_input_names + ["pixel_values", "image_grid_thw"]))

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        padding=True,
        return_tensors=None,
        images_kwargs=None,
        legacy=None,
        **tokenizer_kwargs,
    ) -> BatchFeature:
        r"""Prepares prompts and images for the model.

        Args:
            images: an image or a list of images (nested per-prompt lists are flattened): PIL images, numpy
                arrays, torch tensors or image file paths. They fill the `<|image_pad|>` placeholders of `text`
                in order, across the whole batch.
            text (`str` or `list[str]`): the prompt(s), each `<|image_pad|>` standing for one image.
            videos: not supported (Dimple is an image-text model); must be `None`.
            padding: passed to the tokenizer; by default batches are padded (on the left) to the longest prompt.
            return_tensors: `"pt"`, `"np"` or `None` (lists).
            images_kwargs (`dict`, *optional*): extra arguments of the image processor call.
            legacy: `None` or `False`, ignored: transformers 4.47–4.49's pipeline passes `legacy=False` to ask
                processors for their current behaviour, the only one this processor has.
            **tokenizer_kwargs: extra arguments of the tokenizer call.

        Returns:
            `BatchFeature` with `input_ids` and `attention_mask` (when `text` is given) and `pixel_values`
            (`(patches, 1176)`) and `image_grid_thw` (`(images, 3)`) when images are given.
        """
        if videos is not None:
            raise ValueError("videos: Dimple is an image-text model and does not take video input.")
        if legacy not in (None, False):
            raise ValueError(f"legacy: must be None or False (this processor has no legacy mode), got {legacy!r}")
        if text is None and images is None:
            raise ValueError("DimpleProcessor needs `text`, `images` or both.")
        texts = None if text is None else _as_text_batch(text)
        images = _load_images(images)

        if texts is not None:
            num_placeholders = sum(sample.count(self.image_token) for sample in texts)
            if num_placeholders != len(images):
                raise ValueError(
                    f"images: got {len(images)} image(s) but `text` has {num_placeholders} {self.image_token} "
                    "placeholder(s); pass exactly one image per placeholder."
                )

        data = {}
        tokens_per_image = []
        if images:
            image_inputs = self.image_processor(images=images, return_tensors=return_tensors, **(images_kwargs or {}))
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_grid_thw"] = image_inputs["image_grid_thw"]
            # The vision merger fuses merge_size x merge_size patches into one LLM token.
            merge_length = self.image_processor.merge_size**2
            tokens_per_image = [math.prod(int(v) for v in thw) // merge_length for thw in data["image_grid_thw"]]

        if texts is not None:
            texts, expected = self._expand_image_tokens(texts, tokens_per_image)
            text_inputs = self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
            found = [row.count(self.image_token_id) for row in _as_lists(text_inputs["input_ids"])]
            if found != expected:
                raise ValueError(
                    f"text: expected {expected} {self.image_token} tokens per prompt after expansion, found {found}; "
                    "truncation must not cut image tokens (raise `max_length`)."
                )
            data.update(text_inputs)

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _expand_image_tokens(self, texts, tokens_per_image):
        """Replaces the i-th `<|image_pad|>` of the batch by `tokens_per_image[i]` copies; also returns the number
        of image tokens each prompt must contain."""
        counts = iter(tokens_per_image)
        expanded, expected = [], []
        for sample in texts:
            head, *tails = sample.split(self.image_token)
            sizes = [next(counts) for _ in tails]
            expanded.append(head + "".join(self.image_token * n + tail for n, tail in zip(sizes, tails)))
            expected.append(sum(sizes))
        return expanded, expected

    def apply_chat_template(
        self,
        conversation,
        chat_template=None,
        add_generation_prompt=False,
        add_vision_id=False,
        tokenize=False,
        return_tensors=None,
        return_dict=None,
        processor_kwargs=None,
        **template_kwargs,
    ):
        r"""Renders one conversation (a list of messages) or a batch (a list of conversations) with Qwen2-VL's
        template: a default system turn "You are a helpful assistant.", `<|im_start|>role\n...<|im_end|>\n`
        turns, `<|vision_start|><|image_pad|><|vision_end|>` per image item, "Picture N: " labels when
        `add_vision_id=True`, and `<|im_start|>assistant\n` when `add_generation_prompt=True`.

        Message content is a string or a list of items such as `{"type": "text", "text": ...}` and
        `{"type": "image", "image": <PIL image, array, file path or URL>}` (the source may also be under
        `"path"` or `"url"`, or OpenAI's `{"type": "image_url", "image_url": {"url": ...}}`).

        Returns the prompt string (a list for a batch) or, with `tokenize=True`, the processor's output on the
        prompt(s) and the images found in the items (`processor_kwargs` go to `__call__`); its `input_ids` alone
        with `return_dict=False` (transformers' pipelines ask for `return_dict=True`).
        """
        if not conversation:
            raise ValueError("conversation: expected a list of messages or a list of conversations, got nothing.")
        if return_dict and not tokenize:
            raise ValueError("return_dict=True needs tokenize=True: without tokenizing there is no dict to return.")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        prompts = [
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=chat_template or self.chat_template,
                add_generation_prompt=add_generation_prompt,
                add_vision_id=add_vision_id,
                tokenize=False,
                **template_kwargs,
            )
            for messages in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [
            _image_source(item)
            for messages in conversations
            for message in messages
            if not isinstance(message["content"], str)
            for item in message["content"]
            if item.get("type") in ("image", "image_url") or "image" in item or "image_url" in item  # as the template
        ]
        outputs = self(
            text=prompts if batched else prompts[0],
            images=images or None,
            return_tensors=return_tensors,
            **(processor_kwargs or {}),
        )
        return outputs["input_ids"] if return_dict is False else outputs

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save, then the files made portable: a processor saved on 5.x loads on 4.x too."""
        if push_to_hub:  # the hub copy is saved (through this method) and uploaded by push_to_hub
            repo_id = kwargs.pop("repo_id", pathlib.Path(save_directory).name)
            self.save_pretrained(save_directory, **kwargs)
            return self.push_to_hub(repo_id, **kwargs)
        saved = super().save_pretrained(save_directory, **kwargs)
        write_portable_processor_files(self, save_directory)
        return saved

    def batch_decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwards to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)

    def decode_answers(self, generated_ids, prompt_length=None, skip_special_tokens=True, **decode_kwargs):
        r"""Turns generated ids into answer strings.

        Args:
            generated_ids: one row (`(seq,)`) or a batch (`(batch, seq)`, or a list of rows) of token ids
                (tensors, arrays or lists): either only the generated tokens, or whole sequences when
                `prompt_length` is given.
            prompt_length (`int`, *optional*): width of the (left-padded) prompt to cut from every row, e.g.
                `inputs["input_ids"].shape[1]`.
            skip_special_tokens: passed to the tokenizer's `decode`.

        Returns:
            `str` for one row, `list[str]` for a batch. Each answer is the text up to the first `<|endoftext|>`
            (the pad token: trained answers end in padding) or `<|im_end|>` (eos), so the padding is dropped,
            and without the `<|mask|>` tokens that unfinished decoding leaves.
        """
        rows = _as_lists(generated_ids)
        single = not rows or not hasattr(rows[0], "__iter__")  # a row of ids, not a batch of rows
        rows = [rows] if single else [_as_lists(row) for row in rows]
        stop_ids = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id}
        answers = []
        for row in rows:
            row = row[prompt_length or 0 :]
            end = next((i for i, token in enumerate(row) if token in stop_ids), len(row))
            kept = [token for token in row[:end] if token != self.tokenizer.mask_token_id]
            answers.append(self.tokenizer.decode(kept, skip_special_tokens=skip_special_tokens, **decode_kwargs))
        return answers[0] if single else answers


def _as_lists(values):
    """Tensors and arrays to (nested) Python lists; lists unchanged."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _as_text_batch(text):
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(sample, str) for sample in text):
        return list(text)
    raise ValueError(f"text: expected a string or a non-empty list of strings, got {_describe(text)}.")


def write_portable_processor_files(processor, output_dir) -> None:
    """Keep processor files loadable by transformers 4.x and 5.x alike. 5.x nests the image processor in
    processor_config.json, which 4.x passes on as a duplicate `image_processor` argument, keeps the chat
    template in chat_template.jinja, which 4.x does not read, and lists the special tokens as
    `extra_special_tokens`, a key that 4.47+ reads as a name -> token dict (a list fails to load) and 4.46
    ignores. So the image processor goes to preprocessor_config.json only (with min_pixels / max_pixels for
    4.x), the template also into tokenizer_config.json, and the special tokens under
    `additional_special_tokens`, which every version reads."""
    folder = pathlib.Path(output_dir)
    template, tokenizer_config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if tokenizer_config.exists():
        values = json.loads(tokenizer_config.read_text())
        changed = False
        if template.exists() and "chat_template" not in values:
            values["chat_template"], changed = template.read_text(), True
        if isinstance(values.get("extra_special_tokens"), list):
            special = values.pop("extra_special_tokens")
            values["additional_special_tokens"] = list(dict.fromkeys(values.get("additional_special_tokens", []) + special))
            changed = True
        if changed:
            tokenizer_config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n")
    processor_config = folder / "processor_config.json"
    if processor_config.exists():
        values = json.loads(processor_config.read_text())
        if values.pop("image_processor", None) is not None:
            processor_config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    path = folder / "preprocessor_config.json"
    if path.exists():
        return
    config = processor.image_processor.to_dict()
    size = config.get("size") or {}
    config.setdefault("min_pixels", size.get("shortest_edge", getattr(processor.image_processor, "min_pixels", None)))
    config.setdefault("max_pixels", size.get("longest_edge", getattr(processor.image_processor, "max_pixels", None)))
    config["processor_class"] = type(processor).__name__
    config["auto_map"] = {"AutoProcessor": f"processing_dimple.{type(processor).__name__}"}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _image_source(item: dict):
    """The image of a conversation item: a PIL image, array, file path or URL."""
    for key in ("image", "path", "url", "image_url"):
        source = item.get(key)
        if isinstance(source, dict) and key == "image_url":  # OpenAI's {"image_url": {"url": ...}}
            source = source.get("url")
        if source is not None:
            return source
    raise ValueError(
        f"conversation: the image item {item!r} has no image: give it an `image` (PIL image, array, file path "
        "or URL), a `path` or a `url`, or pass `images=` to the processor with `tokenize=False`."
    )


def _describe(value):
    """Type of `value` for error messages, e.g. `list of NoneType, str`."""
    if isinstance(value, (list, tuple)):
        items = sorted({type(item).__name__ for item in value})
        return f"{type(value).__name__} of {', '.join(items)}" if items else f"empty {type(value).__name__}"
    return type(value).__name__


def _load_images(images):
    """Flattens `images` to a list, opens file paths and checks each image's aspect ratio."""
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        images = [images]
    flat = [image for item in images for image in (item if isinstance(item, (list, tuple)) else [item])]
    loaded = []
    for index, image in enumerate(flat):
        if isinstance(image, (str, os.PathLike)):
            image = _open_image_file(os.fspath(image))
        height, width = _image_size(image, index)
        if min(height, width) == 0 or max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
            raise ValueError(
                f"images[{index}]: a {width}x{height} image has an aspect ratio above {MAX_ASPECT_RATIO}, "
                "which the Qwen2-VL image processor does not accept; crop or pad it."
            )
        loaded.append(image)
    return loaded


def _image_size(image, index):
    if is_pil_image(image):
        width, height = image.size  # whatever the mode (RGBA, palette, ...)
        return height, width
    try:
        return get_image_size(to_numpy_array(image))
    except Exception as error:
        raise ValueError(
            f"images[{index}]: expected a PIL image, a numpy array, a torch tensor or a file path, "
            f"got {_describe(image)} ({error})."
        ) from error


def _open_image_file(path):
    # PIL's decompression-bomb guard stays on: `DecompressionBombError` is not caught here.
    if path.startswith(("http://", "https://")):
        try:
            return load_image(path)  # transformers' loader (downloads when called, never at import)
        except Exception as error:
            raise ValueError(f"images: cannot load image URL {path!r}: {error}") from error
    if not os.path.isfile(path):
        raise ValueError(f"images: {path!r} is not an image file (no such file).")
    try:
        # Applies the EXIF orientation and decodes the whole file, so truncated files fail here.
        return load_image(path)
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"images: cannot read image file {path!r}: {error}") from error


DimpleProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["DimpleProcessor"]
