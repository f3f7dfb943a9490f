#!/usr/bin/env python
"""Build the tiny byte-level BPE tokenizer of the tiny Dimple.

The tokenizer is a real Qwen2 tokenizer (``Qwen2Tokenizer``, backed by ``tokenizer.json``), only with
a few hundred tokens instead of 151 k:

* the BPE is trained with the ``tokenizers`` library on the text of the generated shapes task
  (every question phrasing and answer, see ``dimple_tools/tiny/task.py``) and on the text pieces of
  Dimple's chat template ("system", "user", "assistant", "You are a helpful assistant.",
  "Picture 1: ", ...);
* its normaliser, pre-tokeniser (Qwen2's split regex + byte level) and decoder are exactly those
  ``transformers.Qwen2Tokenizer`` rebuilds on load, and the 256 byte symbols are all in the vocabulary,
  so any text round-trips and the reloaded tokenizer encodes exactly like the trained one;
* all of Dimple's special tokens (``SPECIAL_TOKENS``, in Qwen2's order) are added as atomic special
  tokens right after the BPE vocabulary; bos is ``<|im_start|>``, eos ``<|im_end|>``, pad
  ``<|endoftext|>``, mask ``<|mask|>``, padding on the left (SPEC sections 2 and 3);
* the chat template is copied at build time from the repository's ``tokenizer_config.json``
  (key ``chat_template``; else the repository's ``chat_template.jinja``), falling back to
  Qwen2-VL's template when the repository has none.

Library use::

    from dimple_tools.tiny.tokenizer import build_tiny_tokenizer
    ids = build_tiny_tokenizer("tiny-dimple")   # {"image_token_id": ..., "vocab_size": ..., ...}

Command line (prints the special-token ids as JSON)::

    python -m dimple_tools.tiny.tokenizer --out tiny-dimple

The output is deterministic: the same inputs give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers


from dimple_tools.compat import TRANSFORMERS_5  # noqa: E402
from dimple_tools.tiny.task import iter_task_texts  # noqa: E402
from dimple_tools.paths import REPOSITORY_ROOT


REPO_ROOT = str(REPOSITORY_ROOT)

#: Dimple's special tokens, in the order of their ids in Dimple-7B's vocabulary (151643 ... 151656,
#: then Dream's 151665, 151666). Here they get consecutive ids after the BPE vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|beginoftext|>",
    "<|mask|>",
)

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"

#: Names of the ids returned by ``build_tiny_tokenizer`` (model-config field -> token).
TOKEN_ID_FIELDS: dict[str, str] = {
    "pad_token_id": PAD_TOKEN,
    "bos_token_id": BOS_TOKEN,
    "eos_token_id": EOS_TOKEN,
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
    "vision_token_id": "<|vision_pad|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "mask_token_id": MASK_TOKEN,
}

#: Qwen2's pre-tokenisation regex (identical to ``transformers.models.qwen2.tokenization_qwen2``).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

DEFAULT_VOCAB_SIZE = 512
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen2-VL's chat template (as shipped in Qwen2-VL-7B-Instruct), used only when the repository's
#: ``tokenizer_config.json`` does not provide one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def load_chat_template(repo_root: str = REPO_ROOT) -> str:
    """The chat template of ``repo_root``: the ``chat_template`` key of its ``tokenizer_config.json``,
    else its ``chat_template.jinja`` (the transformers 5 layout), else Qwen2-VL's template."""
    config_path = os.path.join(repo_root, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, str) and template.strip():
            return template
    jinja_path = os.path.join(repo_root, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
        if template.strip():
            return template
    return QWEN2_VL_CHAT_TEMPLATE


def chat_texts(system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_pictures: int = 4) -> list[str]:
    """The plain-text pieces of the chat template (the special tokens themselves are excluded)."""
    texts = ["system\n", "user\n", "assistant\n", system_prompt, "\n"]
    texts += [f"Picture {i}: " for i in range(1, max_pictures + 1)]
    texts += [f"Video {i}: " for i in range(1, max_pictures + 1)]
    return texts


def training_corpus(system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[str]:
    """The BPE training text: chat-template pieces, then the task's questions and answers (both
    as they appear alone and after a newline / space, as in ``"<image>\\nWhat ..."``)."""
    corpus = chat_texts(system_prompt)
    for text in iter_task_texts():
        corpus += [text, "\n" + text, " " + text]
    return corpus


def _new_backend() -> Tokenizer:
    """An empty byte-level BPE with exactly the pipeline ``transformers.Qwen2Tokenizer`` uses."""
    tokenizer = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tokenizer


def train_backend(corpus: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the BPE on ``corpus`` and append ``SPECIAL_TOKENS`` (atomic, not normalised).

    ``vocab_size`` bounds the BPE vocabulary (256 byte symbols + merges); training stops earlier
    once every word of the corpus is a single token.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    tokenizer = _new_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def build_tiny_tokenizer(
    out_dir: str,
    chat_template: str | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    model_max_length: int = 1024,
) -> dict[str, int]:
    """Train the tiny tokenizer and save it to ``out_dir`` as a ``Qwen2Tokenizer`` folder.

    Args:
        out_dir: folder to write (``tokenizer.json``, ``tokenizer_config.json``, chat template).
        chat_template: Jinja chat template; default: ``load_chat_template()`` (the repository's).
        vocab_size: upper bound of the BPE vocabulary before the special tokens.
        model_max_length: maximum sequence length recorded in the tokenizer config.

    Returns:
        The ids the tiny Dimple's config needs: ``pad_token_id``, ``bos_token_id``,
        ``eos_token_id``, ``vision_start_token_id``, ``vision_end_token_id``, ``vision_token_id``,
        ``image_token_id``, ``video_token_id``, ``mask_token_id``, and ``vocab_size`` (the number
        of tokens including the special ones, i.e. ``len(tokenizer)``; all ids are below it).
    """
    import transformers

    # transformers 5's Qwen2Tokenizer is the fast one; 4.x names it Qwen2TokenizerFast and calls the extra
    # special tokens `additional_special_tokens`.
    if TRANSFORMERS_5:
        tokenizer_class, extra_key = transformers.Qwen2Tokenizer, "extra_special_tokens"
    else:
        tokenizer_class, extra_key = transformers.Qwen2TokenizerFast, "additional_special_tokens"
    backend = train_backend(training_corpus(), vocab_size)
    extra = {extra_key: [t for t in SPECIAL_TOKENS if t not in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, MASK_TOKEN)]}
    tokenizer = tokenizer_class(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=None,
        mask_token=MASK_TOKEN,
        **extra,
        padding_side="left",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
        chat_template=chat_template if chat_template is not None else load_chat_template(),
    )
    ids = special_token_ids(tokenizer)
    expected = {t: backend.get_vocab_size(with_added_tokens=False) + i for i, t in enumerate(SPECIAL_TOKENS)}
    actual = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    if actual != expected:  # would mean transformers re-added a special token under a new id
        raise RuntimeError(f"special-token ids moved while wrapping the tokenizer: {actual} != {expected}")
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return ids


def special_token_ids(tokenizer) -> dict[str, int]:
    """The model-config ids of ``tokenizer`` (see ``build_tiny_tokenizer``)."""
    ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in TOKEN_ID_FIELDS.items()}
    ids["vocab_size"] = len(tokenizer)
    return ids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder of the tokenizer")
    parser.add_argument("--vocab-size", "--vocab_size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help=f"upper bound of the BPE vocabulary (default {DEFAULT_VOCAB_SIZE})")
    parser.add_argument("--chat-template-from", metavar="DIR", default=REPO_ROOT,
                        help="folder whose tokenizer_config.json provides the chat template (default: the repository)")
    args = parser.parse_args(argv)
    ids = build_tiny_tokenizer(args.out, chat_template=load_chat_template(args.chat_template_from),
                               vocab_size=args.vocab_size)
    print(json.dumps(ids, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
