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
import re
import secrets

import transformers
from transformers import BatchFeature, ProcessorMixin
from transformers.image_transforms import resize
from transformers.image_utils import (
    PILImageResampling,
    get_image_size,
    infer_channel_dimension_format,
    is_pil_image,
    load_image,
    to_numpy_array,
)

# Qwen2-VL's `smart_resize` rejects images more elongated than this; checking first gives a clearer error.
MAX_ASPECT_RATIO = 200
# PIL modes of 16-bit (and 32-bit integer) grayscale images, e.g. 16-bit PNGs: their values span 0..65535.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Tokens the model's config refers to by id (SPEC §2): the processor refuses a tokenizer without them.
REQUIRED_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}

# Keyword arguments of the image processor: given to the processor call itself (as Qwen2.5-VL users do,
# `processor(images=..., text=..., max_pixels=...)`), they go to the images, not the tokenizer.
IMAGE_PROCESSOR_KWARGS = (
    "min_pixels", "max_pixels", "size", "patch_size", "merge_size", "temporal_patch_size", "do_resize", "resample",
    "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)

PIXEL_BOUND_KWARGS = {"min_pixels", "max_pixels", "size"}

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
        self.special_token_ids = _special_token_ids(self.tokenizer)  # raises when the tokenizer lacks one
        self.image_token_id = self.special_token_ids["image_token_id"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loading, then a check that the tokenizer gives the special tokens the ids that the
        folder's config.json (when there is one, in a local folder) uses: the model reads masks, images and
        end-of-text by these ids."""
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        processor = loaded[0] if isinstance(loaded, tuple) else loaded  # return_unused_kwargs=True gives a pair
        folder = pathlib.Path(os.fspath(pretrained_model_name_or_path)) / (kwargs.get("subfolder") or "")
        if (folder / "config.json").is_file():
            _check_config_token_ids(processor.special_token_ids, folder / "config.json")
        return loaded

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
        split_special_tokens=False,
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
            split_special_tokens (`bool`, default `False`): as transformers' tokenizers, `False` reads special-token
                strings in `text` (`<|im_end|>`, `<|mask|>`, ...) as those tokens; `True` reads them as plain text,
                except the `<|image_pad|>` placeholders of the images. For untrusted text in a chat prompt, use
                `apply_chat_template(..., tokenize=True, split_special_tokens=True)`, which keeps the template's
                own tokens special and reads only the messages' text as plain text.
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
        if split_special_tokens not in (True, False):
            raise ValueError(f"split_special_tokens: must be True or False, got {split_special_tokens!r}")
        segments = None
        if text is not None:
            texts = _as_text_batch(text)
            # A prompt is a list of (text, plain) segments: plain text is tokenized with special-token strings
            # read as plain text.
            if split_special_tokens:
                segments = [self._plain_except_placeholders(sample) for sample in texts]
            else:
                segments = [[(sample, False)] for sample in texts]
        return self._process(segments, images, padding, return_tensors, images_kwargs, tokenizer_kwargs)

    def _plain_except_placeholders(self, sample):
        head, *tails = sample.split(self.image_token)
        segments = [(head, True)]
        for tail in tails:
            segments += [(self.image_token, False), (tail, True)]
        return [segment for segment in segments if segment[0]]

    def _process(self, segments, images, padding, return_tensors, images_kwargs, tokenizer_kwargs):
        images_kwargs = _image_kwargs(images_kwargs, tokenizer_kwargs)
        images = load_images(images)
        if segments is not None:
            num_placeholders = sum(text.count(self.image_token) for row in segments for text, plain in row if not plain)
            if num_placeholders != len(images):
                raise ValueError(
                    f"images: got {len(images)} image(s) but `text` has {num_placeholders} {self.image_token} "
                    "placeholder(s); pass exactly one image per placeholder."
                )

        data = {}
        tokens_per_image = []
        if images:
            images = _fit_pixel_bounds(images, self.image_processor, images_kwargs)
            if PIXEL_BOUND_KWARGS & set(images_kwargs):
                # Per-call bounds: the images are already resized to them (above), since transformers 4.46's image
                # processor reads only its own bounds and 5.x warns about min_pixels / max_pixels.
                images_kwargs = {k: v for k, v in images_kwargs.items() if k not in PIXEL_BOUND_KWARGS}
                images_kwargs["do_resize"] = False
            image_inputs = self.image_processor(images=images, return_tensors=return_tensors, **images_kwargs)
            data["pixel_values"] = image_inputs["pixel_values"]
            data["image_grid_thw"] = image_inputs["image_grid_thw"]
            # The vision merger fuses merge_size x merge_size patches into one LLM token.
            merge_length = images_kwargs.get("merge_size", self.image_processor.merge_size) ** 2
            tokens_per_image = [math.prod(int(v) for v in thw) // merge_length for thw in data["image_grid_thw"]]

        if segments is not None:
            segments, expected = self._expand_image_tokens(segments, tokens_per_image)
            text_inputs = self._tokenize(segments, padding, return_tensors, tokenizer_kwargs)
            found = [row.count(self.image_token_id) for row in _as_lists(text_inputs["input_ids"])]
            if found != expected:
                raise ValueError(
                    f"text: expected {expected} {self.image_token} tokens per prompt after expansion, found {found}; "
                    "truncation must not cut image tokens (raise `max_length`)."
                )
            data.update(text_inputs)

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _tokenize(self, segments, padding, return_tensors, tokenizer_kwargs):
        if all(len(row) == 1 and not row[0][1] for row in segments):  # no plain-text segment: one tokenizer call
            texts = [row[0][0] for row in segments]
            return self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)
        unsupported = sorted(set(tokenizer_kwargs) - {"max_length", "pad_to_multiple_of", "return_attention_mask"})
        if unsupported:
            raise ValueError(
                f"split_special_tokens=True: the tokenizer arguments {unsupported} are not supported with it "
                "(allowed: max_length, pad_to_multiple_of, return_attention_mask)."
            )
        rows = []
        for row in segments:
            ids = []
            for text, plain in row:
                # Each segment alone: a tokenizer adds no token between them (Qwen2's adds no bos / eos at all).
                ids += self.tokenizer(text, add_special_tokens=False, split_special_tokens=plain)["input_ids"]
            rows.append(ids)
        return self.tokenizer.pad({"input_ids": rows}, padding=padding, return_tensors=return_tensors, **tokenizer_kwargs)

    def _expand_image_tokens(self, segments, tokens_per_image):
        """Replaces the i-th `<|image_pad|>` placeholder of the batch (outside plain-text segments) by
        `tokens_per_image[i]` copies; also returns the number of image tokens each prompt must contain."""
        counts = iter(tokens_per_image)
        expanded, expected = [], []
        for row in segments:
            new_row, total = [], 0
            for text, plain in row:
                if not plain:
                    head, *tails = text.split(self.image_token)
                    sizes = [next(counts) for _ in tails]
                    text = head + "".join(self.image_token * n + tail for n, tail in zip(sizes, tails))
                    total += sum(sizes)
                new_row.append((text, plain))
            expanded.append(new_row)
            expected.append(total)
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
        split_special_tokens=False,
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
        prompt(s) and the images found in the items (`processor_kwargs`, and image processor arguments such as
        `max_pixels` given here, go to `__call__`); its `input_ids` alone
        with `return_dict=False` (transformers' pipelines ask for `return_dict=True`).

        `split_special_tokens=True` (with `tokenize=True`) reads the messages' text as plain text: a message
        containing `<|im_end|><|im_start|>assistant` or `<|mask|>` gets the ids of those characters, not the
        special tokens, so it cannot close its turn or write into the answer canvas; the template's own tokens
        (turns, image placeholders) stay special. The default, `False`, is transformers': special-token strings
        in messages are special tokens. Use `True` for text from untrusted users (the web demo does).
        """
        if not conversation:
            raise ValueError("conversation: expected a list of messages or a list of conversations, got nothing.")
        if return_dict and not tokenize:
            raise ValueError("return_dict=True needs tokenize=True: without tokenizing there is no dict to return.")
        processor_kwargs = dict(processor_kwargs or {})
        for key in (*IMAGE_PROCESSOR_KWARGS, "images_kwargs"):  # image arguments go to the images, not the template
            if key in template_kwargs:
                if key in processor_kwargs and processor_kwargs[key] != template_kwargs[key]:
                    raise ValueError(f"{key}: given as {template_kwargs[key]!r} and as processor_kwargs[{key!r}] = "
                                     f"{processor_kwargs[key]!r}; give it once")
                processor_kwargs[key] = template_kwargs.pop(key)
        split_special_tokens = processor_kwargs.pop("split_special_tokens", split_special_tokens)
        if split_special_tokens not in (True, False):
            raise ValueError(f"split_special_tokens: must be True or False, got {split_special_tokens!r}")
        if split_special_tokens and not tokenize:
            raise ValueError(
                "split_special_tokens=True needs tokenize=True: a prompt string cannot mark which text is plain."
            )
        batched = isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        texts = {}
        if split_special_tokens:  # render with a marker in place of each text, then tokenize the texts apart
            nonce = secrets.token_hex(8)
            conversations = [_mark_texts(messages, nonce, texts) for messages in conversations]
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
        if split_special_tokens:
            segments = [_split_marked(prompt, nonce, texts) for prompt in prompts]
            call = {"padding": True, "images_kwargs": None, **processor_kwargs}
            unknown = sorted({"videos", "legacy", "text", "images"} & set(call))
            if unknown:
                raise ValueError(f"processor_kwargs: {unknown} cannot be given to apply_chat_template.")
            outputs = self._process(
                segments, images or None, call.pop("padding"), return_tensors, call.pop("images_kwargs"), call
            )
        else:
            outputs = self(
                text=prompts if batched else prompts[0],
                images=images or None,
                return_tensors=return_tensors,
                **processor_kwargs,
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


def _mark_texts(messages, nonce, texts):
    """A copy of `messages` whose text (string contents and text items) is replaced by markers
    `<nonce:index>`; `texts` maps each marker to its text."""

    def mark(text):
        if not isinstance(text, str):
            return text  # the template reports it
        marker = f"\ue000{nonce}:{len(texts)}\ue001"
        texts[marker] = text
        return marker

    marked = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = mark(content)
        elif isinstance(content, (list, tuple)):
            message["content"] = [
                {**item, "text": mark(item["text"])} if isinstance(item, dict) and "text" in item else item
                for item in content
            ]
        marked.append(message)
    return marked


def _split_marked(prompt, nonce, texts):
    """The rendered `prompt` as (text, plain) segments: the marked texts are plain, the template is not."""
    segments = []
    for index, piece in enumerate(re.split(f"(\ue000{nonce}:\\d+\ue001)", prompt)):
        if index % 2:
            segments.append((texts[piece], True))
        elif piece:
            segments.append((piece, False))
    return [segment for segment in segments if segment[0]]


def _token_id(tokenizer, token):
    """The id of `token` as a single token of `tokenizer`, or None."""
    if not isinstance(token, str) or not token:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id < 0 or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None  # unknown: no id, or the unknown token's
    return token_id


def _special_token_ids(tokenizer):
    """The ids of the special tokens the model uses (config field -> id); a `ValueError` naming every missing
    one when the tokenizer cannot represent them."""
    wanted = {
        "mask_token_id": ("mask_token", tokenizer.mask_token),
        "pad_token_id": ("pad_token", tokenizer.pad_token),
        "eos_token_id": ("eos_token", tokenizer.eos_token),
        **{field: (token, token) for field, token in REQUIRED_TOKENS.items()},
    }
    ids, missing = {}, []
    for field, (name, token) in wanted.items():
        token_id = _token_id(tokenizer, token)
        if token_id is None:
            missing.append(name if token is None else f"{name} {token!r}" if name != token else token)
        ids[field] = token_id
    if missing:
        raise ValueError(
            f"tokenizer: it lacks the special tokens {', '.join(missing)}, which Dimple's config refers to by id "
            "(mask, image, vision start / end, pad, eos); load the checkpoint's own tokenizer (Qwen2 + <|mask|>)."
        )
    return ids


def _check_config_token_ids(token_ids, config_path):
    config = json.loads(pathlib.Path(config_path).read_text())
    wrong = []
    for field, token_id in token_ids.items():
        expected = config.get(field)
        allowed = expected if isinstance(expected, list) else [expected]
        if expected is not None and token_id not in allowed:
            wrong.append(f"{field} {expected} (the tokenizer gives {token_id})")
    if wrong:
        raise ValueError(
            f"tokenizer: its special tokens do not have the ids of {config_path}: {'; '.join(wrong)}. "
            "The model reads these tokens by id: use the tokenizer that was trained with it."
        )


def _qwen2vl_size(height, width, factor, min_pixels, max_pixels, smallest=None):
    """transformers' Qwen2-VL `smart_resize`, in floating point as there: the size its image processor resizes
    to. 4.4x's lets a shrunk side reach 0 (`smallest=0`), later versions keep at least `factor`."""
    smallest = factor if smallest is None else smallest
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(smallest, math.floor(height / beta / factor) * factor)
        w_bar = max(smallest, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fit_size(height, width, factor, min_pixels, max_pixels):
    """The size (multiples of `factor`) Dimple's processor resizes a `height` x `width` image to: Qwen2-VL's
    rule (`smart_resize`), and where that leaves [min_pixels, max_pixels] — its floating-point floor / ceil
    can drop a side one step (a 260 px square became 28 x 28 under min_pixels = max_pixels = 56²), and a
    side clamped to `factor` or rounded up can overshoot — the in-bounds size closest in aspect ratio, then
    in area."""
    size = _qwen2vl_size(height, width, factor, min_pixels, max_pixels)
    if min_pixels <= size[0] * size[1] <= max_pixels:
        return size
    cell = factor * factor
    low, high = max(1, -(-min_pixels // cell)), max_pixels // cell  # pixel bounds in factor x factor cells
    if low > high:
        raise ValueError(
            f"images_kwargs: min_pixels {min_pixels} and max_pixels {max_pixels} admit no image made of "
            f"{factor}x{factor} px blocks; widen them."
        )
    ratio, area = height / width, min(max(height * width, low * cell), high * cell)
    best = None
    for rows in range(1, high + 1):
        cols_low, cols_high = max(1, -(-low // rows)), high // rows
        if cols_low > cols_high:
            continue
        for cols in {min(max(c, cols_low), cols_high) for c in (math.floor(rows / ratio), math.ceil(rows / ratio))}:
            score = (abs(math.log(rows / cols / ratio)), abs(math.log(rows * cols * cell / area)))
            if best is None or score < best[0]:
                best = (score, (rows * factor, cols * factor))
    return best[1]


def resize_target(height, width, factor, min_pixels, max_pixels):
    """The size the processor resizes a `height` x `width` image to before the image processor, or None where
    the image processor's own resize gives `fit_size` (in bounds) on every transformers version: a side under
    `factor` (4.46 refuses it) or a result out of bounds is resized here, and the image processor then keeps
    the size (its rule leaves in-bounds multiples of `factor` as they are)."""
    target = fit_size(height, width, factor, min_pixels, max_pixels)
    if min(height, width) >= factor and target == _qwen2vl_size(height, width, factor, min_pixels, max_pixels, 0):
        return None
    return target


def _image_kwargs(images_kwargs, call_kwargs) -> dict:
    """`images_kwargs` with the image processor's arguments given to the call itself moved in (popped from
    `call_kwargs`, which then holds the tokenizer's); one argument given both ways must agree."""
    if images_kwargs is not None and not isinstance(images_kwargs, dict):
        raise ValueError(f"images_kwargs: must be a dict of image processor arguments, got {type(images_kwargs).__name__}")
    images_kwargs = dict(images_kwargs or {})
    for key in IMAGE_PROCESSOR_KWARGS:
        if key in call_kwargs:
            value = call_kwargs.pop(key)
            if key in images_kwargs and images_kwargs[key] != value:
                raise ValueError(
                    f"{key}: given as {value!r} and as images_kwargs[{key!r}] = {images_kwargs[key]!r}; give it once"
                )
            images_kwargs[key] = value
    for key in ("min_pixels", "max_pixels"):
        value = images_kwargs.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}: must be a positive whole number of pixels, got {value!r}")
    if None not in (images_kwargs.get("min_pixels"), images_kwargs.get("max_pixels")) and \
            images_kwargs["min_pixels"] > images_kwargs["max_pixels"]:
        raise ValueError(
            f"min_pixels ({images_kwargs['min_pixels']}) must be <= max_pixels ({images_kwargs['max_pixels']})"
        )
    return images_kwargs


def _fit_pixel_bounds(images, image_processor, images_kwargs):
    """`images`, each one that Qwen2-VL's image processor would resize outside [min_pixels, max_pixels]
    resized here (`resize_target`); with bounds given on the call (`min_pixels`, `max_pixels`, `size`), every
    image is resized here to `fit_size`'s result for them."""
    kwargs = images_kwargs
    if not kwargs.get("do_resize", getattr(image_processor, "do_resize", True)):
        return images
    per_call = bool(PIXEL_BOUND_KWARGS & set(kwargs))
    size = kwargs.get("size") or getattr(image_processor, "size", None) or {}

    def bound(key, *size_keys):
        if kwargs.get(key) is not None:
            return kwargs[key]
        for name in size_keys:
            value = size.get(name) if isinstance(size, dict) else getattr(size, name, None)
            if value is not None:
                return value
        return getattr(image_processor, key, None)

    min_pixels = bound("min_pixels", "shortest_edge", "min_pixels")
    max_pixels = bound("max_pixels", "longest_edge", "max_pixels")
    patch_size = kwargs.get("patch_size", getattr(image_processor, "patch_size", None))
    merge_size = kwargs.get("merge_size", getattr(image_processor, "merge_size", None))
    if None in (min_pixels, max_pixels, patch_size, merge_size):
        return images
    factor = patch_size * merge_size
    resample = kwargs.get("resample", getattr(image_processor, "resample", None))
    try:
        resample = PILImageResampling(int(resample))
    except (TypeError, ValueError):
        resample = PILImageResampling.BICUBIC
    fitted = []
    for image in images:
        height, width = _image_size(image, len(fitted))
        if per_call:  # resized here to the call's bounds: the image processor then does not resize
            target = fit_size(height, width, factor, min_pixels, max_pixels)
            target = None if target == (height, width) else target
        else:
            target = resize_target(height, width, factor, min_pixels, max_pixels)
        if target is not None:
            if is_pil_image(image):
                if image.mode in ("1", "P"):  # PIL resizes these by nearest neighbour only
                    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
                image = image.resize((target[1], target[0]), resample=resample)
            else:
                array = to_numpy_array(image)
                image = resize(array, target, resample=resample, input_data_format=infer_channel_dimension_format(array))
        fitted.append(image)
    return fitted


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


def load_images(images):
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
        image = _to_8_bit(image)
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


def _to_8_bit(image):
    """A 16-bit grayscale PIL image (e.g. a 16-bit PNG, mode `I;16`) as 8-bit grayscale, its range 0..65535
    mapped onto 0..255 as image viewers show it (value / 257, rounded). PIL's own conversion to RGB clips
    every value above 255, which turned such images all white. Other images are returned unchanged."""
    if is_pil_image(image) and image.mode in SIXTEEN_BIT_MODES:
        return image.convert("I").point(lambda value: value / 257 + 0.5).convert("L")
    return image


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
        # Pillow, which transformers' image loading uses too. transformers' `load_image` converts to RGB at once,
        # which clips 16-bit images; this opens the file as it is, then applies its EXIF orientation, scales
        # 16-bit values to 8 bits and converts to RGB as `load_image` does (decoding the whole file, so
        # truncated files fail here). The import sits in this `try` so that transformers' check of a remote
        # module's imports does not require Pillow of text-only users.
        from PIL import Image, ImageOps

        with Image.open(path) as opened:
            return _to_8_bit(ImageOps.exif_transpose(opened)).convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"images: cannot read image file {path!r}: {error}") from error


DimpleProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["DimpleProcessor"]
